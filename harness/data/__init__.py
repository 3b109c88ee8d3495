"""Training data: img2dataset shards, the webdataset loader, synthetic batches, the digits set, worker plumbing."""
