"""moekit.tasks: MoE beyond language modelling (text and image classification, translation)."""
