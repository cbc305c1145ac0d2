"""The personalization workflow's embedded default: a chat assistant, an organisation's documents, and
the experiment that teaches the assistant the documents and then restores its behaviour."""
