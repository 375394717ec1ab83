// The console's only script of its own: a pausable auto-refresh (htmx polls; this holds it
// while "pause refresh" is ticked). Nothing here reads run content.
document.addEventListener("htmx:beforeRequest", function (event) {
  var pause = document.getElementById("pause-refresh");
  if (pause && pause.checked && event.detail.elt.hasAttribute("data-refresh")) {
    event.preventDefault();
  }
});
