#!/usr/bin/env bash
# Builds paper/main.pdf from paper/main.tex with latexmk (pdflatex + bibtex).
# The paper \inputs the generated tables (reports/tables/*.tex) and includes the generated figures
# (reports/figures/*.pdf): run `dvc repro tables figures` first.
# Installs the Debian TeX packages it needs when they are missing (as root; otherwise it stops and
# prints the exact command to run). A second run with nothing missing installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# texlive-latex-base: pdflatex + LaTeX; -recommended: booktabs, graphicx extras, natbib;
# -extra: multirow, threeparttable...; -fonts-recommended: the Times/Helvetica fonts; latexmk.
APT_PACKAGES=(texlive-latex-base texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended latexmk)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "build_paper: installing Debian packages: ${missing[*]} (a few minutes)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "build_paper: these Debian packages are missing: ${missing[*]}" >&2
    echo "build_paper: not running as root, so install them first with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

# the generated inputs must exist (they are outputs of the tables and figures stages)
absent=()
while IFS= read -r rel; do
  [ -f "paper/$rel" ] || absent+=("${rel#../}")
done < <(grep -oE '\\(input|includegraphics)(\[[^]]*\])?\{[^}]+\}' paper/main.tex | sed -E 's/.*\{([^}]+)\}/\1/')
if [ ${#absent[@]} -gt 0 ]; then
  echo "build_paper: generated files missing: ${absent[*]}" >&2
  echo "build_paper: run 'dvc repro tables figures' first" >&2
  exit 1
fi

cd paper
latexmk -pdf -interaction=nonstopmode -halt-on-error -file-line-error main.tex
echo "build_paper: wrote paper/main.pdf"
