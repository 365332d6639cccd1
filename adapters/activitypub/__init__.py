"""ActivityPub: the gateway hosts Group actors and joins remote groups (Mastodon/Fedify-compatible)."""
