{#
  Fails compilation on a bad var instead of building a silently wrong split.
  Called from int_split and int_user_history.
#}
{% macro validate_vars() %}
  {% set split = var('split') %}
  {% if split not in ['temporal', 'leave_last_out', 'stratified'] %}
    {{ exceptions.raise_compiler_error("var split must be temporal | leave_last_out | stratified, got '" ~ split ~ "'") }}
  {% endif %}
  {% set valid_frac = var('valid_frac') | float %}
  {% set test_frac = var('test_frac') | float %}
  {% if valid_frac < 0 or test_frac < 0 or valid_frac + test_frac >= 1 %}
    {{ exceptions.raise_compiler_error("vars valid_frac/test_frac must be >= 0 with a sum < 1, got " ~ valid_frac ~ "/" ~ test_frac) }}
  {% endif %}
  {% set history_len = var('history_len') | int %}
  {% if history_len < 1 or history_len != (var('history_len') | float) %}
    {{ exceptions.raise_compiler_error("var history_len must be an integer >= 1, got " ~ var('history_len')) }}
  {% endif %}
  {% if (var('split_seed') | string) | length == 0 %}
    {{ exceptions.raise_compiler_error("var split_seed must not be empty") }}
  {% endif %}
{% endmacro %}
