"""The web app: JSON API, pages, and the store of patients, images and predictions."""
