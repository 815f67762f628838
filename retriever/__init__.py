"""retriever package."""
