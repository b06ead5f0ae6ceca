"""Source adapters: one per dataset of PF-1M, the bundled demo, and a generic column-mapping adapter.

``ADAPTERS`` maps the CLI/config name to the adapter class; ``polite ingest --list`` prints it.
"""

from __future__ import annotations

from tasks.sources.base import Adapter
from tasks.sources.captions import COCOCaptions, Flickr30k, TextCaps
from tasks.sources.demo import Demo
from tasks.sources.generic import Generic
from tasks.sources.llava import LLaVAInstruct
from tasks.sources.vqa import AOKVQA, CLEVR, GQA, OCRVQA, OKVQA, ScienceQA, TextVQA, VQAv2

ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (
        Demo, Generic, VQAv2, GQA, AOKVQA, OKVQA, TextVQA, OCRVQA, ScienceQA, CLEVR,
        COCOCaptions, Flickr30k, TextCaps, LLaVAInstruct,
    )
}


def get_adapter(spec, workspace_root: str | None = None) -> Adapter:
    """The adapter instance for a ``SourceSpec``."""
    return ADAPTERS[spec.adapter](spec, workspace_root)
