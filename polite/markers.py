"""Image markers inside instructions: one definition for the record, the prompts and the exports.

Dependency-free on purpose: GPU scripts import the prompt module on machines without our data stack.
"""

IMAGE_MARKER = "<image>"
CHUNK_END = "<|endofchunk|>"
