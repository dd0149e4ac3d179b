// Keyboard shortcuts of the rating page: a key presses the button marked data-key="<key>"; "c" focuses the
// comment box. Keys typed into the comment box are left alone.
document.addEventListener("keydown", function (event) {
  if (event.target.closest("textarea, input") || event.ctrlKey || event.metaKey || event.altKey) {
    return;
  }
  var key = event.key.toLowerCase();
  if (key === "c") {
    event.preventDefault();
    document.getElementById("comment").focus();
    return;
  }
  var button = document.querySelector('button[data-key="' + key + '"]');
  if (button) {
    event.preventDefault();
    button.click();
  }
});
