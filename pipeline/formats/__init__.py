"""The inputs and outputs people already have: chat rows (`chat`, rendered in `chat_sandbox`), OpenAI Batch
API files in (`batch_files`) and out (`batch_export`)."""
