"""REST API (FastAPI) over the same model zoo as the demo, with the Gradio demo mounted at /demo.

    python -m uvicorn api.app:create_app --factory --host 127.0.0.1 --port 8000
"""
