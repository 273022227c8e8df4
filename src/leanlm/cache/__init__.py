"""Response caching for leanlm serve: keys (tenant + model fingerprint + normalized request), the stores
(SQLite by default, Redis to share), the exact tier and the verified semantic tier."""
