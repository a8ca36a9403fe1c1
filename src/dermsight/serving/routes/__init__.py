"""The app's routes, one APIRouter per resource: ``service`` (health, model), ``patients``,
``images`` (uploads, stored images, predictions and heat maps), ``session`` (sign-in and
sign-out) and ``pages`` (the HTML pages). ``create_app`` includes them in that order, which
is the order of the OpenAPI schema's paths."""
