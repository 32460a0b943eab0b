"""The embedded Hugging Face Hub-compatible server (`coopt-hub hub serve`).

It speaks the Hub's HTTP API to the real huggingface_hub and datasets clients, stores each repo as
a bare git repository plus LFS objects, and shares no code with the client side of coopt-hub.
"""

from coopt_hub.server.app import HubServer

__all__ = ["HubServer"]
