"""peerd nat package."""
