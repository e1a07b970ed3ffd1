"""The DMQ module: node list, notification channel, peers (channels), workers and API."""
