"""peerd crdt package."""
