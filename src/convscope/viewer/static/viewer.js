// Keyboard navigation of the convscope viewer. Every page names its neighbours in <link rel="..."> elements
// (next, prev, next-layer, prev-layer, up); a key follows one of them. "?" shows the list of keys.
(function () {
  "use strict";
  var KEYS = {
    ArrowRight: "next", ArrowLeft: "prev",
    ArrowDown: "next-layer", PageDown: "next-layer", "]": "next-layer",
    ArrowUp: "prev-layer", PageUp: "prev-layer", "[": "prev-layer",
    u: "up"
  };

  function follow(rel) {
    var link = document.querySelector('link[rel="' + rel + '"]');
    if (link) { window.location.href = link.href; }
    return Boolean(link);
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) { return; }
    var target = event.target;
    if (target && /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName)) { return; }
    var help = document.getElementById("help");
    if (event.key === "?") {
      help.hidden = !help.hidden;
      event.preventDefault();
    } else if (event.key === "Escape") {
      help.hidden = true;
    } else if (Object.prototype.hasOwnProperty.call(KEYS, event.key)) {
      if (follow(KEYS[event.key])) { event.preventDefault(); }
    }
  });

  document.addEventListener("click", function (event) {
    var help = document.getElementById("help");
    if (!help.hidden && event.target === help) { help.hidden = true; }
  });
})();
