"""The training stages of S2SNet as `trainer.Stage`s, one module each; this module names them.

- `ClassifierStage` (stage 0, `classifier_stage`): trains a registry classifier
  with cross-entropy, on clean images or adversarially (Madry's PGD training),
  for data that has no pretrained classifier, and as the robustness anchor.
- `ReconstructionStage` (stage 1, `reconstruction_stage`): unsupervised
  reconstruction in the autoencoder's normalised space (MSE or L1); labels are
  ignored.
- `DecoderStage` (stage 2, `decoder_stage`): fine-tunes the decoder (or the
  whole autoencoder) with the frozen classifier's gradients: the paper's
  objective, or an adversarial one against the soft-routing surrogate attack.

What they share (`ModelConfig`, BatchNorm re-estimation, summaries) is in
`stage_common`, the inner attack of the adversarial objectives in `adversarial`.
Callers import the names from here: `stages.DecoderStage(stages.ModelConfig(...))`.
"""

from s2s_tf.train.classifier_stage import STAGE0_OBJECTIVES
from s2s_tf.train.classifier_stage import ClassifierStage
from s2s_tf.train.decoder_stage import STAGE2_OBJECTIVES
from s2s_tf.train.decoder_stage import STAGE2_PARTS
from s2s_tf.train.decoder_stage import DecoderStage
from s2s_tf.train.reconstruction_stage import ReconstructionStage
from s2s_tf.train.stage_common import ModelConfig
from s2s_tf.train.stage_common import RecalibratedStage
from s2s_tf.train.stage_common import Recalibration
from s2s_tf.train.stage_common import load_or_build_classifier
from s2s_tf.train.stage_common import recalibrate_batch_norm
from s2s_tf.train.stage_common import trained_batch_norms

__all__ = [
    "STAGE0_OBJECTIVES",
    "STAGE2_OBJECTIVES",
    "STAGE2_PARTS",
    "ClassifierStage",
    "DecoderStage",
    "ModelConfig",
    "RecalibratedStage",
    "Recalibration",
    "ReconstructionStage",
    "load_or_build_classifier",
    "recalibrate_batch_norm",
    "trained_batch_norms",
]
