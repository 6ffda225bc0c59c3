"""The CIFAR-10 lab demo (Gradio UI over cifar_core): `python -m demo`."""
