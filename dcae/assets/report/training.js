"use strict";
// The training page: a slider over the saved sample images, by step.
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const slider = document.getElementById("sample-step");
  if (!slider || !DATA.samples.length) return;
  const image = document.getElementById("sample-image"), label = document.getElementById("sample-label");
  function show(i) {
    const sample = DATA.samples[i];
    image.src = sample.src;
    label.textContent = "step " + sample.step + " (" + (i + 1) + " of " + DATA.samples.length + ")";
  }
  slider.max = String(DATA.samples.length - 1);
  slider.value = slider.max;
  slider.addEventListener("input", () => show(+slider.value));
  show(DATA.samples.length - 1);
})();
