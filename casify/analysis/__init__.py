"""Channel-wise activation analysis of the paper's Section 3: magnitude (Fig. 1), frequency (Fig. 2) and t-SNE (Fig. 9).

Every public name is importable from here; the files split it by job, each importing only those above it in this list:

- ``files.py``: atomic file writes shared by the figures and the report.
- ``statistics.py``: the statistics as pure functions of (N, C) or (C,) tensors (magnitude, frequency, entropy, Gini,
  gaps).
- ``capture.py``: :class:`ActivationProbe` and :func:`channel_activations` (where a layer's activation is read, before
  or after a CAS mask), the penultimate-feature probe, and the helpers that feed probes (example batches, device,
  attack objective, default layer).
- ``figures.py``: Figures 1 and 2 (matplotlib, without pyplot).
- ``tsne.py``: :func:`tsne_plot`, the t-SNE embedding and its figure (Figure 9).
- ``report.py``: :class:`ChannelReport`, :func:`analyze` and :func:`run_analysis` (what ``casify analyze`` runs).
"""
from .capture import (CAS_SIDES, NO_CAS, NO_CAS_HERE, ActivationProbe, Data, channel_activations, default_layer,
                      pool_channels)
from .figures import ArrayLike, plot_frequency, plot_magnitude
from .report import REPORT_JSON, REPORT_MD, ChannelReport, analyze, run_analysis
from .statistics import (activation_frequency, channel_magnitude, class_frequency_summary, frequency_gap,
                         frequency_summary, gini, magnitude_gap, normalized_entropy)
from .tsne import TSNEResult, tsne_plot

__all__ = [
    "CAS_SIDES", "NO_CAS", "NO_CAS_HERE", "Data", "ArrayLike", "REPORT_JSON", "REPORT_MD",
    "ActivationProbe", "channel_activations", "pool_channels", "default_layer",
    "channel_magnitude", "magnitude_gap", "activation_frequency", "normalized_entropy", "gini", "frequency_gap",
    "frequency_summary", "class_frequency_summary",
    "plot_magnitude", "plot_frequency",
    "TSNEResult", "tsne_plot",
    "ChannelReport", "analyze", "run_analysis",
]
