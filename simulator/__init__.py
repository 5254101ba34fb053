"""Serverless training on the local Lambda + EFS: protocol, models, aggregation and the runner."""
