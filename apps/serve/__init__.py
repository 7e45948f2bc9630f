"""`elm serve`: an OpenAI-compatible HTTP server with a chat page, on Starlette and uvicorn."""
