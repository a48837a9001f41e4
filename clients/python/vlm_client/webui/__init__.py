"""The web UI (Gradio) over the gateway: `python -m vlm_client.webui` or `make ui`."""
