"""The web UI: a Gradio page over the gateway's gRPC API, in its own process.

    VLM_API_KEY=dev-local-key python -m vlm_client.webui            # http://127.0.0.1:7860
    python -m vlm_client.webui --address gateway.internal:50051 --port 7860

It talks to the gateway with the Python client, so it works against any deployment. The API key
comes from the environment and stays in this process: the page never sees it. The page listens on
127.0.0.1 unless told otherwise, and has no login of its own: put it behind one before binding it to
other hosts."""

from __future__ import annotations

import argparse
import os
import sys

# Gradio's usage statistics and version check reach the internet; a service's UI sends nothing out.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from vlm_client.client import DEFAULT_ADDRESS, VLMClient  # noqa: E402
from vlm_client.webui.handlers import DETAILS, FALLBACK_MODELS, TASKS, WebUI, sampled_frames  # noqa: E402

# System fonts: the default theme would fetch its fonts from Google's servers.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# Uploads larger than the gateway's default video limit would only be refused by it (an image over
# its 20 MB limit is refused by the gateway, saying so).
MAX_UPLOAD = "64mb"


def build(ui: WebUI) -> gr.Blocks:
    with gr.Blocks(title="Vision-language models") as page:
        turns = gr.State([])
        gr.Markdown("## Vision-language models\nAdd images or a video, ask; the conversation is kept until "
                    "*New conversation*.")
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Conversation", elem_id="chat", height=460, latex_delimiters=[],
                                  feedback_options=None, buttons=["copy", "copy_all"])
                box = gr.MultimodalTextbox(elem_id="ask", file_types=["image"], file_count="multiple",
                                           sources=["upload"], placeholder="Ask about your images or video…",
                                           show_label=False)
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop", variant="secondary")
                    new = gr.Button("New conversation", elem_id="new")
                with gr.Row():
                    video = gr.File(label="Video for the next question (MP4, WebM, animated GIF)", elem_id="video",
                                    file_types=[".mp4", ".webm", ".gif"], file_count="single", height=120)
                    with gr.Column():
                        # The service's bounds and defaults (vlm.v1.Video).
                        fps = gr.Slider(0.1, 30, value=2, step=0.1, label="Frames per second", elem_id="fps")
                        max_frames = gr.Slider(2, 256, value=32, step=1, label="Max frames", elem_id="max-frames")
                frames_note = gr.Markdown(elem_id="frames-note")
                frames = gr.Gallery(label="Frames sent (the service's sampling)", elem_id="frames", visible=False,
                                    columns=8, height=180, object_fit="contain")
            with gr.Column(scale=2):
                model = gr.Dropdown(list(FALLBACK_MODELS), value="auto", label="Model", elem_id="model",
                                    info="auto: Pixtral for diagrams, else Qwen2.5-VL with a fallback to Pixtral")
                task = gr.Dropdown(list(TASKS), value="none", label="Task", elem_id="task",
                                   info="A task's answer also comes as a typed result, shown below")
                with gr.Accordion("Parameters", open=False):
                    max_tokens = gr.Slider(1, 4096, value=256, step=1, label="Max tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature", info="0: greedy")
                    top_p = gr.Slider(0.01, 1, value=1, step=0.01, label="Top p")
                    detail = gr.Radio(list(DETAILS), value="default", label="Image detail")
                details = gr.Markdown(elem_id="details")
                gallery = gr.Gallery(label="Boxes", elem_id="boxes", visible=False, columns=1, height=360,
                                     object_fit="contain")
                table = gr.Dataframe(label="Table", elem_id="table", visible=False, interactive=False)
                markdown = gr.Markdown(elem_id="result", visible=False)
        outputs = [box, chat, turns, details, gallery, table, markdown, video]
        asked = box.submit(ui.respond, [box, turns, model, task, max_tokens, temperature, top_p, detail, video, fps,
                                        max_frames], outputs)
        # Previewed on the user's upload or removal, not when sending empties the upload: the gallery
        # then keeps showing the frames that were sent.
        for event in (video.upload, video.clear, fps.change, max_frames.change):
            event(sampled_frames, [video, fps, max_frames], [frames, frames_note], trigger_mode="always_last")
        stop.click(None, cancels=[asked])
        new.click(ui.clear, None, outputs, cancels=[asked])
        chat.clear(ui.clear, None, outputs, cancels=[asked])  # the conversation panel's own bin
        page.load(ui.models, None, [model, details])
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_client.webui", description=__doc__.split("\n")[0])
    parser.add_argument("--address", help=f"the gateway's gRPC host:port (default: $VLM_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="answers streaming at once across all visitors; more wait in line (default: %(default)s)")
    parser.add_argument("--ca-file", help="TLS to the gateway: the authority that signed its certificate, PEM "
                                          "(default: $VLM_CA_FILE; plain text unless this or --cert-file is set)")
    parser.add_argument("--cert-file", help="mutual TLS: the UI's client certificate, PEM (default: $VLM_CERT_FILE)")
    parser.add_argument("--key-file", help="mutual TLS: that certificate's private key (default: $VLM_KEY_FILE)")
    args = parser.parse_args(argv)
    # A long deadline for an answer; a gateway that cannot be reached is said within connect_timeout.
    try:  # the API key: VLM_API_KEY
        client = VLMClient(args.address, timeout=600.0, ca_file=args.ca_file, cert_file=args.cert_file,
                           key_file=args.key_file)
    except ValueError as error:  # a TLS file that cannot be read, named
        parser.error(str(error))
    page = build(WebUI(client))
    page.queue(default_concurrency_limit=args.concurrency)
    print(f"web UI on http://{args.host}:{args.port} (gateway {client.address})", file=sys.stderr, flush=True)
    page.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, theme=THEME,
                footer_links=[], ssr_mode=False, mcp_server=False, show_error=False, quiet=True)
    return 0
