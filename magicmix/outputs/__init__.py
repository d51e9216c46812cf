"""Where results go: the service store and users' own buckets."""
