"""Test harness: a real ComfyUI runtime, twin tiny models, a live server and a workflow checker."""
