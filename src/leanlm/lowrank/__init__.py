"""Low-rank factorization: each targeted linear becomes two smaller ones (SVD-LLM's truncation-aware
whitening, or plain SVD / ASVD as baselines), ranks allocated under a parameter budget."""
