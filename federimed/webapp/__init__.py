"""`federimed serve`: the clinician page, the JSON API and the operator dashboard.

One FastAPI application (FastAPI, Starlette and uvicorn already come with Flower, Jinja2 with
torch, so the web app adds no dependency), server-rendered pages with every asset shipped in
the package (hospital networks are offline: no CDN), reading the model folder and the runs
folder read-only.
"""
