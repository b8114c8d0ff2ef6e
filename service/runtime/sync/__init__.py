"""The synchronous lane: device worker threads, the executor the routes await, dynamic batching."""
