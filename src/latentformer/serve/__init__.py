"""Serving: the OpenAI-compatible HTTP API (`latentformer serve`) over the continuous-batching engine."""
