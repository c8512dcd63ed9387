"""peerd collectives package."""
