"""peerd optim package."""
