"""The language experiment (issue 17): does CALM give the English anchor (SmolLM2-135M-Instruct) the
multilingual skill of Gemma-3-270m? See experiments/language/README.md."""
