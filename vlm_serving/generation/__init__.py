"""Generation: batched decoding with per-request parameters, its sampling, cancellation and model loading."""
