"""The OpenAI surface: images, chat completions, models."""
