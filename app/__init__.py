"""Server-side helpers of server.PromptServer: frontend files, users and settings, jobs, logs, models."""
