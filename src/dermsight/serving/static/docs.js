// Starts Swagger UI on /docs from the app's own copy (no inline script, no CDN).
"use strict";
const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  domNode: root,
  deepLinking: true,
  validatorUrl: null,  // never send the schema to the public validator
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
