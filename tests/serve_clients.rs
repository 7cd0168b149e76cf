//! `sanctum serve` driven by the official `openai` and `ollama` Python clients.
