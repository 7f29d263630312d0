"""Load tests of a pair: Locust users with dual connections, the scheduled failover, the report."""
