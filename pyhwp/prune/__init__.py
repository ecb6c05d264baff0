"""Pruning: masks by criterion and pattern, calibration, schedules, fine-tuning with masks held,
weight redistribution, structural channel removal and BatchNorm folding."""

from pyhwp.prune.bnfold import conv_bn_pairs, fold_batchnorm, fold_conv_bn
from pyhwp.prune.calibrate import activation_norms, input_grams, taylor_scores
from pyhwp.prune.criteria import CRITERIA
from pyhwp.prune.finetune import MaskHold, finetune, hold_masks
from pyhwp.prune.graph import ChannelGroup, UnsupportedGraphError, channel_graph
from pyhwp.prune.layers import apply_masks, mask_sparsity, prunable_layers
from pyhwp.prune.masks import PATTERNS, make_mask, make_masks_global
from pyhwp.prune.redistribute import redistribute, redistribute_weight
from pyhwp.prune.schedule import cubic_sparsity, gradual_schedule, one_shot_schedule, prune_gradually
from pyhwp.prune.structural import channel_masks, mask_channels, remove_channels

__all__ = [
    "CRITERIA", "PATTERNS", "ChannelGroup", "MaskHold", "UnsupportedGraphError", "activation_norms",
    "apply_masks", "channel_graph", "channel_masks", "conv_bn_pairs", "cubic_sparsity", "finetune",
    "fold_batchnorm", "fold_conv_bn", "gradual_schedule", "hold_masks", "input_grams", "make_mask",
    "make_masks_global", "mask_channels", "mask_sparsity", "one_shot_schedule", "prunable_layers",
    "prune_gradually", "redistribute", "redistribute_weight", "remove_channels", "taylor_scores",
]
