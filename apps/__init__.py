"""Gradio apps over the mmsae pipeline: concept search (search.py), steering (steer.py), unlearning
(unlearn.py). Each has a handler class (plain Python) and a `build_*_app(...) -> gr.Blocks` taking
loaded objects; `mmsae app search|steer|unlearn` (cli.py) loads them from disk and serves on localhost.
Gradio is imported only by those modules, so `import mmsae.apps` stays cheap."""
