"""Talking to the server: an HTTP client, a LangChain chat model, a LangGraph agent, a terminal chat."""
