"""Export of the defended composite model as a TF Serving SavedModel.

Installed as `s2s_tf.export`.
"""
