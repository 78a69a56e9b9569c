{#
  Passes when the model holds exactly one row; the failing row reports how many it holds.
#}
{% test exactly_one_row(model) %}

select count(*) as n_rows
from {{ model }}
having count(*) != 1

{% endtest %}
