// Starts Swagger UI on /docs or ReDoc on /redoc from the app's own copies (no inline script, no CDN),
// with the settings that make their pages pass axe-core (tests/test_pages_e2e.py).
"use strict";
const swagger = document.getElementById("swagger-ui");
const redoc = document.getElementById("redoc");
if (swagger) {
  window.ui = SwaggerUIBundle({
    url: swagger.dataset.openapiUrl,
    domNode: swagger,
    // Off: with deep links each operation's path is a link inside its expand button (axe: nested-interactive).
    deepLinking: false,
    validatorUrl: null,  // never send the schema to the public validator
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
  // "Try it out" gives an array's file pickers no label (axe: label): name each after its field.
  new MutationObserver(() => {
    for (const input of swagger.querySelectorAll("tr[data-property-name] input[type=file]:not([aria-label])")) {
      input.setAttribute("aria-label", input.closest("tr").dataset.propertyName);
    }
  }).observe(swagger, { childList: true, subtree: true });
}
if (redoc) {
  // ReDoc's default greys, inline code red and response tabs on the dark panel are below WCAG AA contrast
  // (axe: color-contrast); docs.css darkens what the theme cannot reach.
  Redoc.init(redoc.dataset.openapiUrl, {
    theme: {
      colors: { text: { secondary: "#595f63" }, responses: { error: { tabTextColor: "#ff8a87" },
        success: { tabTextColor: "#4caf50" } } },
      typography: { code: { color: "#b71c1c" } },
    },
  }, redoc);
}
