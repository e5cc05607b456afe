"""nf nftui."""
