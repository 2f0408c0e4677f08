"""Built-in synthetic chest radiographs in CheXpert layout.

The generator has two separate halves so that each can be tested on its own:

* **Labels** (no pixels, :mod:`~cxrlabel.synth.labels`): :func:`sample_labels` draws the *true*
  findings of a study as ``{observation: severity}``; :func:`report_labels` turns the truth into
  what a report-mining labeller would write (uncertain, noisy and blank cells in train; the exact
  truth in valid).
* **Pixels** (:mod:`~cxrlabel.synth.film`): :func:`generate_image` draws a film for given
  findings. Every finding has a visible mechanism with a severity (bigger heart, fluid level with
  meniscus, pleural line without vessels beyond it, ...), so a CNN can learn it and tests can
  measure it.

:func:`write_dataset` (:mod:`~cxrlabel.synth.dataset`) ties both together and writes
``train.csv``/``valid.csv`` plus JPEGs; :func:`contact_sheet` (:mod:`~cxrlabel.synth.sheet`)
shows a grid of captioned examples for people.

Modules, lowest first (each imports only those above it): ``config`` (every knob, the seed tree),
``labels``, ``anatomy`` (habitus, film technique, structures moved by findings), ``canvas``
(drawing primitives), ``findings`` (finding painters), ``frontal`` and ``lateral`` (the two
views), ``film``, ``dataset``, ``sheet``.
"""

from cxrlabel.synth.anatomy import Anatomy, sample_anatomy
from cxrlabel.synth.config import (
    DEFAULT_CONFIG,
    FINDINGS,
    META_COLUMNS,
    PARENCHYMAL,
    FindingSpec,
    SynthConfig,
    csv_columns,
    image_rng,
)
from cxrlabel.synth.dataset import (
    StudyPlan,
    SynthSummary,
    plan_dataset,
    render_study,
    write_dataset,
)
from cxrlabel.synth.film import generate_image
from cxrlabel.synth.labels import report_labels, sample_labels
from cxrlabel.synth.sheet import caption_height, caption_text, contact_sheet

__all__ = [
    "DEFAULT_CONFIG",
    "FINDINGS",
    "META_COLUMNS",
    "PARENCHYMAL",
    "Anatomy",
    "FindingSpec",
    "StudyPlan",
    "SynthConfig",
    "SynthSummary",
    "caption_height",
    "caption_text",
    "contact_sheet",
    "csv_columns",
    "generate_image",
    "image_rng",
    "plan_dataset",
    "render_study",
    "report_labels",
    "sample_anatomy",
    "sample_labels",
    "write_dataset",
]
