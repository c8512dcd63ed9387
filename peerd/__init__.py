"""peerd: fault-tolerant peer-to-peer training daemon."""
