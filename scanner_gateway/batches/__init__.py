"""Batch jobs: OpenAI's Files and Batches, durable in a database, worked by every gateway process."""
